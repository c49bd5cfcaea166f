"""Backends behind one interface (see base.Backend). Only `native` exists so far."""
