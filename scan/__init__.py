"""The SCAN library: config schema and loader, model, cross attention, loss, recall metrics,
collectives, feature backbones and the sharded evaluation. Knows no launcher, engine or Ray."""
