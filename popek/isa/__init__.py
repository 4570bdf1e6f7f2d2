"""popek.isa: the ISA description language, the bundled IA-32 description, the classifier, the theorems."""
from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=2)
def bundled_classifier(extended: bool = False):
    """The classifier of the bundled IA-32 description under the ``ia32`` model, built once per process
    (about 50 ms); ``extended`` also names int3, syscall, the VMX/SVM instructions and the others of
    DESIGN §3.1's extended list."""
    from popek.isa import language
    from popek.isa.classify import Classifier
    return Classifier(language.bundled(), "ia32", extended=extended)
