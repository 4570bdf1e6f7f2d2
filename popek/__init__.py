"""popek: can a virtual machine monitor run this x86 code faithfully, and at what cost?"""

__version__ = "0.1.0"
