"""moekit.data"""
