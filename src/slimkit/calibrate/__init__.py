"""Calibration statistics gathered once and shared: activation ranges, input Hessians."""
