"""Training callbacks, installed as ``mom_lit.callbacks``."""

from mom_lit.callbacks.routing import RoutingStatsCallback, load_heatmap, routing_summary

__all__ = ["RoutingStatsCallback", "load_heatmap", "routing_summary"]
