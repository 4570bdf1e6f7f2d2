"""popek.machine"""
