"""privcam's sensor emulator: the EMVA 1288 chain and the keyed ADC readout.

Start at :class:`sensor.sensor.Sensor` (``expose`` and ``capture``), configured by
:class:`sensor.config.SensorConfig`; keys are :mod:`sensor.keys`, the readout :mod:`sensor.readout`.
"""
