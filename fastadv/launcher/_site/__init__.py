"""The folder fastadv-run puts on PYTHONPATH (its sitecustomize and the hook it installs); a package only so that
it installs with fastadv."""
