"""isthmus.backends.reference"""
