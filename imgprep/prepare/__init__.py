"""Turning images into databases: lists, archives, resizing, builds, means, merges, inspection.
Never imports imgprep.loading.
"""
