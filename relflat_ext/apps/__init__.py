"""Applications built on the library: the report (`make report`), the reproduction of the paper's
figures, the command line, and the models and training loop they share. Imports from every layer
below; nothing below imports from here."""
