"""``python -m pure_reasoner.train.world --out DIR ...``: write the built-in world (see ``generator``)."""

from pure_reasoner.train.world.generator import main

if __name__ == "__main__":
    main()
