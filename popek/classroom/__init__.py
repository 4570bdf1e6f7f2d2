"""The classroom: exercises with checkers (``popek exercise``) and the guided tour (``popek demo``)."""
