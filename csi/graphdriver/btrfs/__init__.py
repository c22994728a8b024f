"""The btrfs driver (driver) and the btrfs ioctls it calls (ioctl)."""
