"""moekit.integrations"""
