"""The devicemapper thin-pool driver (driver) and the device-mapper ioctls (ioctl)."""
