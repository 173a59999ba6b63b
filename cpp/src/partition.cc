#include "geocell/s2.h"
