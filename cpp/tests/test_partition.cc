// Tests of the partitioner core.
#include "test_util.h"
