// Tests of the S2 core.
#include "test_util.h"
