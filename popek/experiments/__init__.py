"""popek.experiments"""
