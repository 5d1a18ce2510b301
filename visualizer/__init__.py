"""The live Bokeh dashboard (`recsys dashboard`), in Bokeh's directory-app format.

Bokeh runs `main.py` once per browser session and `app_hooks.py` once per server; both import
their helpers absolutely (`from visualizer import ...`), so every session shares one `state`.
"""
