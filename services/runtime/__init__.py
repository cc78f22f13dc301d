"""The runtime every FitTracker service shares: bootstrap, interceptors, settings, storage, caches."""
