"""The experiment lab: the `causalattn` console script, the demo, the generated tasks and the training
job that shows what the causal losses do. It uses the library like any user would; the library
(`causalattn`, `causalattn.hf`, `causalattn.data`) never imports it."""
