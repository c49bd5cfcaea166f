"""Serving slmkit past one process: ray.py runs `slm serve`'s app as a Ray Serve application."""
