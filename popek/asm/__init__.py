"""popek.asm"""
