"""The main job: causal adapter training (`causalattn train`)."""
