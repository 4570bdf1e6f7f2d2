"""popek.isa"""
