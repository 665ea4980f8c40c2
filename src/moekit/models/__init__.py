"""moekit.models"""
