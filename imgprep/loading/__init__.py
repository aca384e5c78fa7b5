"""Turning databases into batches: the epoch plan, the draws, the policies, the DALI loader, the
PyTorch Dataset, preview and bench-loader. Never imports imgprep.prepare.
"""
