"""`python -m optsys.eval`: hands over to the entry point optsys.eval_cli (which sits above the trainers, where
a `stage:<recipe>` model can be trained first; this package is below them)."""

from optsys.eval_cli import main

if __name__ == "__main__":
    main()
