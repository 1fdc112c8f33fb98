"""One router per resource; each stays thin and calls the serving layer in ``app.services``."""
