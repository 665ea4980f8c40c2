"""moekit.merging"""
