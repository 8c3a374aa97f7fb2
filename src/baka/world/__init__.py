"""The shapes world: a procedural dataset (:mod:`baka.world.render`), a judge without neural nets
(:mod:`baka.world.score`) and the evaluation of models trained on it (:mod:`baka.world.eval`)."""
