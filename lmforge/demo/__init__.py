"""The demo world: a small bilingual world of facts and sums (world.py), the data every stage trains on
(sft, prefs, rl, choice, tool_data), its grading rule, its tool, and `write.py`, which writes it all to disk."""
