"""isthmus.configs"""
