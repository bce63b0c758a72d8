"""The demo's scenes, the prompt-following benchmark that scores them, its reports and intervals, and the ablation study."""
