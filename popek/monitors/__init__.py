"""popek.monitors"""
