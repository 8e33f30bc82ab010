"""Engine-neutral models, one package each (``isthmus.models.<name>``): architecture, config
schema, data view, evaluation, commands and plugin registration. Nothing outside a model's own
package names it."""
