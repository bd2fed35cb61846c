"""Serving: real-time endpoints and batch inference on replicas of registered models."""
