"""Models for tests and the offline demo: ``tiny`` (a few-MB random Kandinsky-shaped model), ``mini`` (the small
model trained on digits that ships in assets/mini_digits)."""
