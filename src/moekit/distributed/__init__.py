"""moekit.distributed"""
