"""Training side of endostream, in rooms by role; see training/README.md for the rooms and their one-way arrows."""
