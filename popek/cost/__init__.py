"""popek.cost"""
