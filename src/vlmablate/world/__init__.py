"""The embedded tiny world: scenes, data in the public formats, pretrained components, all from a seed."""
