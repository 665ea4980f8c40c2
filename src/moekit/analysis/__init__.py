"""moekit.analysis"""
