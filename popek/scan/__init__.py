"""popek.scan"""
