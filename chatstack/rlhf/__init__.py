"""RLHF: rankings -> reward model -> PPO (InstructGPT's recipe). See docs/rlhf.md."""
