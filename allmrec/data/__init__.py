"""Data: raw readers, text cleaning, sequence building, splits and seeded candidates (no Ray)."""
