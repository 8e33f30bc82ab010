"""isthmus.backends"""
