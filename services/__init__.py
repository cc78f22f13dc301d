"""FitTracker's Python services: one shared runtime and five domain services."""
