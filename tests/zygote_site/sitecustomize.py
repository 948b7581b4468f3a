"""Imported by every Python process the test session starts (this folder is on its PYTHONPATH): where a warm zygote
matches it, the process becomes the stand-in of a forked child (tests/zygote_site/zygote_client.py)."""

import zygote_client

zygote_client.run_forked_or_return()
