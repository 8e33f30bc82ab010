"""isthmus.plugins"""
