"""moekit.experiments"""
