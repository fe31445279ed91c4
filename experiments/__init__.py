"""absl-flag experiment scripts (``python -m experiments.<study>``)."""
